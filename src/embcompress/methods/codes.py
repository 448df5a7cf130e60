"""Compositional codes (Shu & Nakayama, "Compressing Word Embeddings via Deep Compositional Code
Learning", ICLR 2018, arXiv 1711.01068).

A row's code is M integers in [0, K); its vector is the SUM of the M selected codewords
(additive codes, not product quantization). Two states, recorded in :meth:`layout`:

- ``"learning"`` (end-to-end training, the default after ``build``): a query table feeds the
  paper's encoder (section 3.2) h = tanh(W1 q + b1), logits = W2 h + b2,
  log_alpha = log(softplus(logits) + 1e-8) reshaped (M, K); a Gumbel-softmax sample (straight-through
  hard by default, temperature annealed over training steps) selects the codewords. Eval = argmax.
- ``"fixed"`` (after :meth:`CompositionalCodeEmbedding.freeze_codes` or a post hoc fit): integer codes
  (a buffer) + trainable codebooks, the "codes + codebooks in, embeddings out" layer downstream models use.

Shapes:
    query      (V, d)         learning state only (training memory, never exported)
    W1, b1     (H, d), (H,)   H = hidden (0 = the paper's M*K/2)
    W2, b2     (M*K, H), (M*K,)
    log_alpha  (N, M, K)      per looked-up row
    codes      (V, M) int64   fixed state; exported bit-packed at ceil(log2 K) bits each
    codebooks  (M, K, d)      row = sum_m codebooks[m, code_m]
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..additive import (additive_refine, beam_encode, improve_codes, least_squares_codebooks, local_search_codes,
                        relative_error, residual_kmeans, row_errors)
from ..base import CompressedEmbedding
from ..bitpack import bits_for, packed_size
from ..config import FitConfig, MethodConfig, SpecError
from ..frozen import FrozenCodebook
from ..frozen.codebook import decode_codes, straight_through
from ..progress import progress_bar
from ..query import QueryTableMixin
from ..registry import register
from ..training import adam_steps

__all__ = ["CodesConfig", "CodesFit", "CompositionalCodeEmbedding", "preferred_codewords", "max_books", "fit_work"]

log = logging.getLogger(__name__)

STATES = ("learning", "fixed")
_EPS = 1e-8  # the paper's log(softplus(.) + 1e-8), section 3.2
_DTYPES = {"float32": torch.float32, "float16": torch.float16}
MIN_CODEWORDS = 8  # the paper's smallest K (its tables use 8, 16 and 32)


@dataclass(frozen=True)
class CodesConfig(MethodConfig):
    method: ClassVar[str] = "codes"
    books: int = field(default=32, metadata={"help": "M: codebooks per row; the row is the sum of M codewords"})
    codewords: int = field(default=16, metadata={"help": "K: codewords per codebook (code bits = ceil(log2 K))"})
    tau: float = field(default=1.0, metadata={"help": "initial Gumbel-softmax temperature of end-to-end training"})
    tau_min: float = field(default=0.5, metadata={"help": "the temperature never anneals below this"})
    anneal_rate: float = field(default=1e-4, metadata={
        "help": "temperature = max(tau_min, tau * exp(-anneal_rate * step)), step = training forwards so far"})
    hard: bool = field(default=True, metadata={
        "help": "end-to-end forward uses the one-hot sample with the soft sample's gradient (straight-through)"})
    hidden: int = field(default=0, metadata={"help": "encoder hidden size; 0 = the paper's M*K/2"})
    codebook_dtype: str = field(default="float32", metadata={
        "help": "stored codebook precision, float32 or float16 (half the codebook bytes; the module rounds "
                "its codebooks to it in every forward, so export equals the module)"})
    sparse: bool = field(default=False, metadata={
        "help": "learning state: the query table gets sparse gradients (rows looked up only), like "
                "nn.Embedding(sparse=True); needs an optimizer that takes them (SGD, SparseAdam, Adagrad); "
                "works under DDP"})

    def validate(self) -> None:
        if self.books < 1:
            raise SpecError(f"codes: books must be >= 1, got {self.books}")
        if not 2 <= self.codewords <= 65536:
            raise SpecError(f"codes: codewords must be in 2..65536, got {self.codewords}")
        if not (self.tau > 0 and 0 < self.tau_min <= self.tau):
            raise SpecError(f"codes: need 0 < tau_min <= tau, got tau={self.tau}, tau_min={self.tau_min}")
        if not self.anneal_rate >= 0:
            raise SpecError(f"codes: anneal_rate must be >= 0, got {self.anneal_rate}")
        if self.hidden < 0:
            raise SpecError(f"codes: hidden must be >= 0 (0 = books*codewords/2), got {self.hidden}")
        if self.codebook_dtype not in _DTYPES:
            raise SpecError(f"codes: codebook_dtype must be one of {', '.join(_DTYPES)}, got {self.codebook_dtype!r}")

    @property
    def hidden_size(self) -> int:
        return self.hidden or max(1, self.books * self.codewords // 2)


@dataclass(frozen=True)
class CodesFit(FitConfig):
    """The post hoc fit's stages (see :meth:`CompositionalCodeEmbedding._fit`)."""

    method: ClassVar[str] = "codes"
    steps: int = field(default=0, metadata={
        "help": "Gumbel autoencoder steps of the paper's encoder (0 = skip the stage, the post hoc default)",
        "min": 0})
    rounds: int = field(default=2, metadata={"help": "least-squares + code-update rounds on the sample", "min": 0})
    beam: int = field(default=8, metadata={"help": "partial codes kept per row by the beam searches", "min": 0})
    sample: int = field(default=65536, metadata={"help": "rows the start and the autoencoder train on", "min": 1})
    polish: int = field(default=4, metadata={"help": "LSQ++ local-search rounds on all rows", "min": 0})
    search: int = field(default=4, metadata={"help": "perturb-and-ICM trials per row in each polish", "min": 0})
    batch_size: int = field(default=1024, metadata={"help": "rows per autoencoder step", "min": 1})
    lr: float = field(default=3e-3, metadata={"help": "Adam learning rate of the autoencoder", "min": 0.0})
    seed: int | None = field(default=None, metadata={"help": "seed of every random draw; none = drawn"})
    procedure: Literal["refine", "autoencoder"] = field(default="refine", metadata={
        "help": "refine: the library's fit (stages below); autoencoder: the paper's Gumbel-softmax autoencoder "
                "alone from a random start, on every row, for steps steps (0 = the paper's 200,000; batch_size, "
                "lr: the paper uses 128 and 1e-4); the other settings are then unused"})


#: The paper's autoencoder training length (Shu & Nakayama, section 5.1), for procedure="autoencoder".
PAPER_AUTOENCODER_STEPS = 200_000


def _gumbel(shape: torch.Size, generator: torch.Generator | None = None) -> torch.Tensor:
    uniform = torch.rand(shape, generator=generator).clamp_(1e-10, 1 - 1e-7)
    return -torch.log(-torch.log(uniform))


@register
class CompositionalCodeEmbedding(QueryTableMixin, CompressedEmbedding[CodesConfig]):
    """Additive compositional codes, trainable end to end or fitted post hoc to a matrix.

    Example:
        >>> table = CompositionalCodeEmbedding.from_pretrained(torch.randn(500, 16), "codes:books=4,codewords=16",
        ...                                                    fit="polish=1")
        >>> table.layout()
        {'state': 'fixed'}
        >>> frozen = table.export()   # bit-packed codes + codebooks, combine="sum"
        >>> frozen.num_bytes()        # 500 rows x 4 books x 4 bits + 4 x 16 x 16 fp32
        5096
    """

    Config = CodesConfig
    Fit = CodesFit
    TAKES_ROW_WEIGHTS = True
    codes: torch.Tensor  # registered buffers (fixed state; step: learning state), declared for the type checker
    step: torch.Tensor

    def __init__(self, num_embeddings: int, embedding_dim: int, config: Any = None,
                 padding_idx: int | None = None, layout: dict[str, Any] | None = None) -> None:
        super().__init__(num_embeddings, embedding_dim, config, padding_idx)
        cfg = self.config
        state = (layout or {}).get("state", "learning")
        if state not in STATES:
            raise ValueError(f"codes: layout state must be one of {', '.join(STATES)}, got {state!r}")
        # Sum of M codewords of variance 1/M: output entries start near N(0, 1), like nn.Embedding.
        self.codebooks = nn.Parameter(torch.randn(cfg.books, cfg.codewords, embedding_dim) / cfg.books ** 0.5)
        self.state = "learning"
        if state == "learning":
            self._add_query_table(num_embeddings, embedding_dim, cfg.sparse)
            self.encoder = self._new_encoder()
            # Shape (1,), not (): io's checksum views tensors as bytes, which 0-dim tensors refuse.
            self.register_buffer("step", torch.zeros(1, dtype=torch.long))
        else:
            self._to_fixed(torch.zeros(num_embeddings, cfg.books, dtype=torch.long))

    def _new_encoder(self) -> nn.Sequential:
        cfg = self.config
        return nn.Sequential(nn.Linear(self.embedding_dim, cfg.hidden_size), nn.Tanh(),
                             nn.Linear(cfg.hidden_size, cfg.books * cfg.codewords))

    def _to_fixed(self, codes: torch.Tensor) -> None:
        for name in ("query_table", "encoder", "step"):
            if hasattr(self, name):
                delattr(self, name)
        self.register_buffer("codes", codes.to(device=self.codebooks.device, dtype=torch.long).contiguous())
        self.state = "fixed"

    def layout(self) -> dict[str, Any]:
        return {"state": self.state}

    # -- sizes ---------------------------------------------------------------------------------
    @classmethod
    def expected_bytes(cls, config: CodesConfig, num_embeddings: int, embedding_dim: int) -> int:
        itemsize = _DTYPES[config.codebook_dtype].itemsize
        return (packed_size(num_embeddings, config.books, bits_for(config.codewords))
                + itemsize * config.books * config.codewords * embedding_dim)

    @classmethod
    def budget_candidates(cls, num_embeddings: int, embedding_dim: int, base: CodesConfig,
                          fit_time: float = 1.0) -> list[CodesConfig]:
        """Every M for one codebook size K per codebook precision; the largest that fits wins.

        K is the largest power of two (8..256) whose codebook costs at most 1/16 of the codes it
        indexes (see :func:`preferred_codewords`), and never below the paper's smallest, 8: with
        K = 2 a budget buys hundreds of books, slow to train and no better. Budgets below one
        such book fall back to K = 2 or 4 with as many books as cost less than it. float16
        codebooks come first: at equal bytes they buy more codewords. GloVe 400k x 50 at 80
        bits/row -> 11x128 with float16 codebooks (77 code bits, 3.99 MB): relative MSE 0.110 with the
        default fit. With an earlier quick fit, 11x128 gave 0.136 where 9x256 fp16 (72 code bits) gave 0.146.
        40 bits/row -> 6x64 fp32 (36 code bits, 1.88 MB): 0.359 with :meth:`quick_fit_options`.

        Books are capped by :func:`max_books` so the default fit stays within about two minutes
        (``fit_time`` times that) at every shape (the fit grows with rows x d x books x (K + 300),
        :func:`fit_work`); where the cap binds, larger K (up to 256) is offered too, each under its own
        cap: at 20,000 x 300 and 10x the rule once picked 195 books of 8 codewords, a fit that had not
        finished after 15 minutes. Wide tables then use only part of the budget (50,000 x 1,024 at 10x:
        one book of 256, 186x), and so does GloVe 400k x 50 at 10x (14 x 128, 5.26 of 8 MB) unless
        ``fit_time`` is at least 2 (22 x 128 with fp16 books: relative MSE 0.019 against 0.068). Smaller
        K would not buy more code bits under that cap: a book of 8 codewords costs 308/428 of one of 128
        but holds 3 of its 7 bits.
        """
        out = []
        for dtype in ("float16", "float32"):
            k = max(MIN_CODEWORDS, preferred_codewords(num_embeddings, embedding_dim, _DTYPES[dtype].itemsize))
            uncapped = max(1, min(256, 16 * embedding_dim // bits_for(k)))
            most = min(uncapped, max_books(num_embeddings, embedding_dim, k, fit_time))
            out += [base.replace(books=m, codewords=k, codebook_dtype=dtype) for m in range(1, most + 1)]
            floor = cls.expected_bytes(out[-most], num_embeddings, embedding_dim)
            larger = k * 2
            while most < uncapped and larger <= 256:  # the cap binds: buy bits with larger codebooks instead
                cap = min(uncapped, max_books(num_embeddings, embedding_dim, larger, fit_time))
                out += [base.replace(books=m, codewords=larger, codebook_dtype=dtype) for m in range(1, cap + 1)]
                larger *= 2
            for small in (2, 4):
                fallback = [base.replace(books=m, codewords=small, codebook_dtype=dtype) for m in range(1, most + 1)]
                out += [c for c in fallback if cls.expected_bytes(c, num_embeddings, embedding_dim) < floor]
        return out

    # -- the encoder (learning state) ----------------------------------------------------------
    def log_alpha(self, vectors: torch.Tensor) -> torch.Tensor:
        """Encoder of section 3.2: (N, d) -> log(softplus(W2 tanh(W1 e + b1) + b2) + 1e-8) as (N, M, K)."""
        logits = self.encoder(vectors)
        return torch.log(F.softplus(logits) + _EPS).reshape(-1, self.config.books, self.config.codewords)

    def temperature(self) -> float:
        """The Gumbel-softmax temperature at the current training step."""
        cfg = self.config
        step = int(self.step[0]) if self.state == "learning" else 0
        return max(cfg.tau_min, cfg.tau * math.exp(-cfg.anneal_rate * step))

    @torch.no_grad()
    def current_codes(self, ids: torch.Tensor | None = None, chunk: int = 65536) -> torch.Tensor:
        """Eval-mode codes (N, M): the stored codes, or the argmax of the encoder for every row."""
        if self.state == "fixed":
            return self.codes.clone() if ids is None else self.codes[ids]
        ids = torch.arange(self.num_embeddings, device=self.query.device) if ids is None else ids
        parts = [self.log_alpha(self.query[ids[s:s + chunk]]).argmax(-1) for s in range(0, ids.numel(), chunk)]
        return torch.cat(parts) if parts else torch.zeros(0, self.config.books, dtype=torch.long)

    def stored_codebooks(self) -> torch.Tensor:
        """The codebooks at the precision the artifact stores (``codebook_dtype``), as float32.

        fp16 rounding is applied in the forward with a straight-through gradient, so training sees
        the deployed values and the export decodes exactly like this module.
        """
        books = self.codebooks
        if self.config.codebook_dtype == "float32":
            return books
        rounded = books.to(_DTYPES[self.config.codebook_dtype]).float()
        return books + (rounded - books).detach()

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        codebooks = self.stored_codebooks()
        if self.state == "fixed":
            return decode_codes(self.codes[ids], codebooks, "sum")
        # sparse=True: the (V, d) query gradient holds only the looked-up rows, so the backward pass
        # and the optimizer touch N rows instead of the whole table (nn.Embedding(sparse=True)).
        log_alpha = self.log_alpha(self._query_rows(ids, sparse=self.config.sparse))
        if not self.training:
            return decode_codes(log_alpha.argmax(-1), codebooks, "sum")
        tau = self.temperature()
        if torch.is_grad_enabled():
            self.step += 1
        # Gumbel noise -log(-log u), the same draws as _gumbel, computed in place: at N = 16k ids and
        # M x K = 512 every (N, M, K) temporary is 32 MB of elementwise traffic.
        noise = torch.rand(log_alpha.shape).clamp_(1e-10, 1 - 1e-7).log_().neg_().log_().neg_().to(log_alpha)
        soft = F.softmax((log_alpha + noise) / tau, dim=-1)
        if self.config.hard:
            # Straight-through: forward = the sum of the sampled codewords (exactly what eval decodes
            # for those codes), backward = as through soft @ codebooks; no one-hot tensor is built.
            hard = decode_codes(_first_argmax(soft), codebooks, "sum")
            return straight_through(hard, soft, codebooks, "sum")
        # (N, M K) @ (M K, d): one matmul, not a batched one over books plus a sum of M (N, d) parts.
        return soft.reshape(ids.shape[0], -1) @ codebooks.reshape(-1, self.embedding_dim)

    @torch.no_grad()
    def freeze_codes(self) -> "CompositionalCodeEmbedding":
        """Switch to the fixed state: codes = eval-mode argmax codes of every row; codebooks stay
        trainable. Eval outputs do not change. Build a new optimizer afterwards (the query table and
        encoder are dropped; the codebooks are the same Parameter)."""
        if self.state == "learning":
            self._to_fixed(self.current_codes())
        return self

    @torch.no_grad()
    def rescale_output_(self, factor: float) -> None:
        self.codebooks.mul_(factor)  # the codes come from the query alone, so they stay

    def export(self) -> FrozenCodebook:
        codebooks = self.codebooks.detach().to(_DTYPES[self.config.codebook_dtype]).clone()
        return FrozenCodebook.from_codes(self.current_codes(), codebooks, "sum", self.padding_idx)

    # -- post hoc fit --------------------------------------------------------------------------
    #: Fit options of :meth:`quick_fit_options` (the demo's preset): about a sixth of the default
    #: fit's time for a little more error (GloVe 400k x 50, 11x128 fp16: relative MSE 0.128 vs 0.109;
    #: timings in the README's demo table).
    QUICK_FIT: ClassVar[dict[str, Any]] = {"steps": 0, "rounds": 1, "beam": 2, "sample": 16384, "polish": 1,
                                           "search": 2}

    def _fit(self, weight: torch.Tensor, settings: CodesFit, progress: bool | None) -> CodesFit:
        return self._fit_weighted(weight, settings, progress, None)

    def _fit_weighted(self, weight: torch.Tensor, settings: CodesFit, progress: bool | None,
                      row_weights: torch.Tensor | None) -> CodesFit:
        """Fit codes and codebooks to ``weight`` (V, d); ends in the fixed state.

        ``procedure="autoencoder"`` runs the paper's fit alone instead (:meth:`_paper_fit`). The
        default, ``"refine"``:

        1. Strong start, on at most ``sample`` rows: residual k-means with a beam of ``beam`` partial
           codes per row, then ``rounds`` of least-squares codebooks + code updates (beam search and ICM).
        2. The paper's encoder (section 3.2) on those rows: pre-trained to predict the codes
           (cross-entropy, ``steps // 2`` steps), then trained as the Gumbel-softmax autoencoder (soft
           samples, tau = 1, loss 0.5 ||recon - e||^2, Adam) for ``steps`` steps from the refined
           codebooks; per row the better of its argmax codes and the refined codes is kept. Measured on
           GloVe 400k x 50 (11x128) it adds nothing: after 50 steps its argmax codes alone reach relative
           MSE 0.79 (maxp 0.19) and win on 0.00% of rows, at a high cost (a 704-wide hidden layer).
           So post hoc the default is ``steps=0``; pass ``steps`` > 0 to run the paper's stage.
        3. All rows: per row the best of three encodings (beam search over the refined codebooks in
           energy order and in stored order, and the residual k-means chain of the start, the only
           sane one when many small books make least-squares codebooks cancel), then ICM, then
           least-squares codebooks. MiniLM's 30522 x 384 table at 197 books x 8: relative MSE 0.70
           with the fresh beam search alone, 0.38 with the three.
        4. ``polish`` rounds on all rows: LSQ++ iterated local search (``search`` perturb-and-ICM
           trials per row) then least-squares codebooks. The error never increases in stages 3-4.
        The autoencoder's mean max probability ("maxp") is logged and kept in ``last_maxp``.

        Measured on GloVe 400k x 50, 11x128 fp16 (3.99 MB, 80 bits/row): defaults -> relative MSE
        0.110 (the single-encoding stage 3 gave 0.115, and took longer); :meth:`quick_fit_options`
        -> 0.128 (timings: the README and benchmarks/results/posthoc_glove.md).

        With ``row_weights`` w the fit minimizes sum_i w_i ||e_i||^2: the residual k-means and every
        least-squares codebook solve weigh rows by w (a row's best codes do not depend on w), and the
        sample keeps each row's weight.
        ``procedure="autoencoder"`` (the paper's, an unweighted reconstruction) takes no weights.
        """
        weight = self._check_fit_weight(weight).detach().float().cpu()
        cfg = self.config
        steps, rounds, beam, sample, polish, search = (settings.steps, settings.rounds, settings.beam, settings.sample,
                                                        settings.polish, settings.search)
        batch_size, lr, seed = settings.batch_size, settings.lr, settings.seed
        assert seed is not None  # fit() draws it
        generator = torch.Generator().manual_seed(seed)
        if settings.procedure == "autoencoder":
            if row_weights is not None:
                raise ValueError("codes: procedure=autoencoder (the paper's fit) takes no row_weights; "
                                 "use the default procedure=refine")
            self._paper_fit(weight, steps or PAPER_AUTOENCODER_STEPS, batch_size, lr, generator, progress)
            return settings
        rows = weight.shape[0]
        stages = ["start", "refine", "autoencoder", "all rows"] + [f"polish {i + 1}" for i in range(polish)]
        bar = progress_bar(stages, desc="codes: fit", enabled=progress)
        for stage in bar:
            if hasattr(bar, "set_postfix_str"):
                bar.set_postfix_str(stage, refresh=True)
            if stage == "start":
                keep = None if rows <= sample else torch.randperm(rows, generator=generator)[:sample]
                train = weight if keep is None else weight[keep]
                train_weights = row_weights if keep is None or row_weights is None else row_weights[keep]
                if train_weights is not None and not bool((train_weights > 0).any()):
                    train_weights = None  # the sample drew only rows of weight 0: fall back to equal weights
                start_books, codes = residual_kmeans(train, cfg.books, cfg.codewords, beam=max(1, beam), seed=seed,
                                                     weights=train_weights)
            elif stage == "refine":
                codebooks, codes = additive_refine(train, codes, cfg.codewords, rounds=rounds, beam=beam,
                                                   weights=train_weights)
            elif stage == "autoencoder" and steps > 0:
                codes = self._autoencoder_codes(train, codes, codebooks, steps, batch_size, lr, generator,
                                                progress)
                codebooks = least_squares_codebooks(train, codes, cfg.codewords, weights=train_weights)
            elif stage == "all rows" and train is not weight:
                # Three encodings, best per row: the residual k-means chain of the start (the only sane
                # one with many books; see beam_encode) and fresh beam searches in both book orders.
                chain = beam_encode(weight, start_books, max(1, beam), order="stored")
                codes = improve_codes(weight, chain, codebooks, beam=max(1, beam), sweeps=1)
                codebooks = least_squares_codebooks(weight, codes, cfg.codewords, weights=row_weights)
                log.info("codes: all rows encoded, relative MSE %.4f",
                         relative_error(row_errors(weight, codes, codebooks), weight))
            elif stage.startswith("polish"):
                codes = local_search_codes(weight, codes, codebooks, iters=search, generator=generator)
                codebooks = least_squares_codebooks(weight, codes, cfg.codewords, weights=row_weights)
        log.info("codes: final relative MSE %.4f", relative_error(row_errors(weight, codes, codebooks), weight))
        with torch.no_grad():
            self._to_fixed(codes)
            self.codebooks.data = codebooks.to(self.codebooks.device)
        return settings

    def _paper_fit(self, weight: torch.Tensor, steps: int, batch_size: int, lr: float, generator: torch.Generator,
                   progress: bool | None) -> None:
        """The paper's procedure alone (sections 3.2-3.3): encoder and codebooks from a random start, raw
        (unstandardized) inputs, soft Gumbel-softmax samples at tau = 1, loss 0.5 ||recon - e||^2;
        codes = argmax of the encoder's log_alpha for every row, codebooks = the decoder's."""
        cfg = self.config
        with torch.random.fork_rng():  # a seeded init that leaves the global RNG alone
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (), generator=generator)))
            encoder = self._new_encoder()
        # Decoder init at the data's scale: a sum of M codewords of variance var(e) / M.
        scale = float(weight.std()) / cfg.books ** 0.5
        books = nn.Parameter(torch.randn(cfg.books, cfg.codewords, self.embedding_dim, generator=generator) * scale)
        fitted = self._train_autoencoder(encoder, books, weight, steps, batch_size, [
            {"params": encoder.parameters(), "lr": lr}, {"params": [books], "lr": lr}], generator, progress)
        with torch.no_grad():
            codes = torch.cat([_log_alpha(encoder, weight[s:s + 65536], cfg).argmax(-1)
                               for s in range(0, weight.shape[0], 65536)])
            log.info("codes: paper autoencoder fit, relative MSE %.4f",
                     relative_error(row_errors(weight, codes, fitted), weight))
            self._to_fixed(codes)
            self.codebooks.data = fitted.to(self.codebooks.device)

    def _autoencoder_codes(self, weight: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor, steps: int,
                           batch_size: int, lr: float, generator: torch.Generator,
                           progress: bool | None) -> torch.Tensor:
        """Train the section 3.2 autoencoder on ``weight`` and return, per row, the better of its argmax
        codes and ``codes`` (under ``codebooks``)."""
        cfg = self.config
        encoder, codebooks_ae = self._autoencoder(weight, codes, codebooks, steps, batch_size, lr, generator,
                                                  progress)
        with torch.no_grad():
            enc_codes = torch.cat([_log_alpha(encoder, weight[s:s + 65536], cfg).argmax(-1)
                                   for s in range(0, weight.shape[0], 65536)])
        log.info("codes: autoencoder argmax codes alone, relative MSE %.4f",
                 relative_error(row_errors(weight, enc_codes, codebooks_ae), weight))
        better = row_errors(weight, enc_codes, codebooks) < row_errors(weight, codes, codebooks)
        log.info("codes: autoencoder codes better on %.2f%% of rows", 100 * float(better.float().mean()))
        return torch.where(better.unsqueeze(1), enc_codes, codes)

    def _autoencoder(self, weight: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor, steps: int,
                     batch_size: int, lr: float, generator: torch.Generator,
                     progress: bool | None) -> tuple[nn.Module, torch.Tensor]:
        cfg = self.config
        rows = weight.shape[0]
        batch = min(batch_size, rows)
        with torch.random.fork_rng():  # a seeded encoder init that leaves the global RNG alone
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (), generator=generator)))
            encoder = self._new_encoder()
        # Inputs are standardized per column for the encoder only (its tanh saturates otherwise).
        mean, std = weight.mean(0), weight.std(0).clamp_min(1e-6)
        net = nn.Sequential(_Standardize(mean, std), encoder)
        pre_steps = max(1, steps // 2)

        def pretraining_step() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            idx = torch.randint(0, rows, (batch,), generator=generator)
            log_alpha = _log_alpha(net, weight[idx], cfg)
            return F.cross_entropy(log_alpha.reshape(-1, cfg.codewords), codes[idx].reshape(-1)), {}

        adam_steps(pretraining_step, net.parameters(), steps=pre_steps, lr=lr, schedule="constant",
                   desc="codes: encoder pre-training", progress=progress)
        books = nn.Parameter(codebooks.clone())
        return net, self._train_autoencoder(net, books, weight, steps, batch_size, [
            {"params": net.parameters(), "lr": lr}, {"params": [books], "lr": lr * 0.1}], generator, progress)

    def _train_autoencoder(self, net: nn.Module, books: nn.Parameter, weight: torch.Tensor, steps: int,
                           batch_size: int, groups: list[dict[str, Any]], generator: torch.Generator,
                           progress: bool | None) -> torch.Tensor:
        """Section 3.2's Gumbel-softmax autoencoder steps on random rows of ``weight``; returns the codebooks."""
        cfg = self.config
        rows = weight.shape[0]
        batch = min(batch_size, rows)
        maxp = float("nan")

        def autoencoder_step() -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
            nonlocal maxp
            idx = torch.randint(0, rows, (batch,), generator=generator)
            target = weight[idx]
            log_alpha = _log_alpha(net, target, cfg)
            # Section 3.2: soft Gumbel-softmax sample at tau = 1, no straight-through.
            soft = F.softmax(log_alpha + _gumbel(log_alpha.shape, generator), dim=-1)
            recon = torch.einsum("nmk,mkd->nd", soft, books)
            loss = 0.5 * (recon - target).pow(2).sum(1).mean()
            with torch.no_grad():
                maxp = float(F.softmax(log_alpha, -1).amax(-1).mean())
            return loss, {"loss": loss, "maxp": maxp}

        adam_steps(autoencoder_step, groups, steps=steps, lr=groups[0]["lr"], schedule="constant",
                   desc="codes: gumbel autoencoder", progress=progress)
        log.info("codes: gumbel autoencoder %d steps, maxp %.3f", steps, maxp)
        self.last_maxp = maxp
        return books.detach()


def _first_argmax(x: torch.Tensor) -> torch.Tensor:
    """``x.argmax(-1)`` (the first maximum on ties) for a last dim of at most 255: the first index
    attaining the maximum is the largest of (K - k) over the k that attain it; argmax is a few
    times slower at training sizes. Larger K falls back to argmax."""
    size = x.shape[-1]
    if size > 255:
        return x.argmax(-1)
    rank = torch.arange(size, 0, -1, dtype=torch.uint8, device=x.device)
    top = (x >= x.amax(-1, keepdim=True)).view(torch.uint8).mul_(rank).amax(-1)
    # A NaN row matches nothing (top = 0): clamp keeps the code in range.
    return (size - top.long()).clamp_(max=size - 1)


class _Standardize(nn.Module):
    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def _log_alpha(net: nn.Module, x: torch.Tensor, cfg: CodesConfig) -> torch.Tensor:
    return torch.log(F.softplus(net(x)) + _EPS).reshape(-1, cfg.books, cfg.codewords)


#: Default post hoc fit work (see :func:`fit_work`) that stays within about 100 CPU seconds on one
#: thread of this machine. Measured (one thread): 50,000 x 1,024 at 1 x 256 (2.8e10) 64 s; 20,000 x 300
#: at 4 x 256 (1.3e10) 56 s; 10,000 x 64 at 44 x 8 (2.2e9) 28 s. Small books cost about as much as
#: large ones per row and dim (the passes over the residuals, not the codeword products, dominate).
MAX_FIT_WORK = 2e10
#: Codeword-independent part of a book's work per row and dim, in codewords (see :func:`fit_work`).
BOOK_OVERHEAD = 300


def fit_work(num_embeddings: int, embedding_dim: int, books: int, codewords: int) -> float:
    """The default post hoc fit's work in the units of :data:`MAX_FIT_WORK`:
    min(V, 65536) x d x books x (K + :data:`BOOK_OVERHEAD`)."""
    return min(num_embeddings, 65536) * embedding_dim * books * (codewords + BOOK_OVERHEAD)


def max_books(num_embeddings: int, embedding_dim: int, codewords: int, fit_time: float = 1.0) -> int:
    """Most books whose default post hoc fit stays within ``fit_time`` x :data:`MAX_FIT_WORK` (at least 1)."""
    return max(1, int(fit_time * MAX_FIT_WORK // fit_work(num_embeddings, embedding_dim, 1, codewords)))


def preferred_codewords(num_embeddings: int, embedding_dim: int, itemsize: int = 4,
                        share: float = 1 / 16) -> int:
    """Largest K in 2..256 (powers of two) whose codebook (``itemsize`` bytes per entry) costs at most
    ``share`` of the bit-packed codes it indexes."""
    best = 2
    for k in (4, 8, 16, 32, 64, 128, 256):
        if itemsize * k * embedding_dim <= share * num_embeddings * bits_for(k) / 8:
            best = k
    return best
