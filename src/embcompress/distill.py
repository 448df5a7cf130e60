"""Knowledge distillation of a compressed student from its uncompressed teacher.

Stage 2 of Distilled Embedding (Lioutas, Rashid et al., Findings of EMNLP 2020, Sec. 3.2): after
the post hoc fit, fine-tune the compressed model against the original with temperature-scaled
logit distillation (Hinton et al. 2015: T^2 * KL(softmax(t/T) || softmax(s/T))), the task loss
when labels are given, and optionally an MSE pulling each compressed table toward the teacher's
table. It works for every method. Encoders without logits (sentence encoders) are distilled on
their outputs instead: cosine or MSE between pooled embeddings.

Batches: a tensor (the model's positional input), a dict of keyword inputs (its ``"labels"``
key, if any, holds the labels), or a tuple ``(inputs, labels)``. Shapes in logits mode:
student and teacher logits (*, C), labels (*) with -100 ignored.

Checkpoints are safetensors + JSON (parameters, buffers, Adam moments, RNG states), never
pickle; ``resume=True`` continues an interrupted run from the last checkpoint, bit for bit
when the batches come in the same order.

Example:
    >>> import copy, embcompress
    >>> teacher = nn.Sequential(nn.Embedding(100, 16), nn.Linear(16, 4))   # logits (*, 4)
    >>> student = copy.deepcopy(teacher)
    >>> report = embcompress.compress_(student, "lowrank:rank=4")
    >>> batches = [torch.randint(0, 100, (8, 5)) for _ in range(4)]
    >>> result = embcompress.distill(student, teacher, batches, steps=8, temperature=2.0,
    ...                              checkpoint="runs/kd", table_weight=1.0)
    >>> len(result.losses)
    8
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .base import CompressedEmbedding
from .config import Config, SpecError
from .io import ArtifactError, json_ready, read_folder_bundle, write_folder_bundle
from .validation import json_int, json_object
from .progress import progress_bar

__all__ = ["distill", "DistillConfig", "DistillResult", "distillation_loss", "mean_pool"]

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "distill.json"
ForwardFn = Callable[[nn.Module, Any], torch.Tensor]


@dataclass
class DistillResult:
    """What a :func:`distill` run did: the loss at every step it ran."""

    steps: int
    start_step: int = 0
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def first_loss(self) -> float:
        return self.losses[0] if self.losses else math.nan

    @property
    def final_loss(self) -> float:
        """Mean of the last 10% of the step losses (a single step is noisy)."""
        if not self.losses:
            return math.nan
        tail = self.losses[-max(1, len(self.losses) // 10):]
        return sum(tail) / len(tail)


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """(B, L, d) token states -> (B, d) mean over unmasked tokens (sentence-transformers pooling)."""
    if attention_mask is None:
        return hidden.mean(dim=1)
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(teacher/T) || softmax(student/T)), averaged over rows (Hinton et al. 2015);
    the T^2 keeps gradient magnitudes comparable across temperatures."""
    s = F.log_softmax(student_logits.reshape(-1, student_logits.shape[-1]) / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.reshape(-1, teacher_logits.shape[-1]) / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature ** 2


def _split_batch(batch: Any) -> tuple[Any, torch.Tensor | None]:
    if isinstance(batch, Mapping):
        inputs = dict(batch)
        return inputs, inputs.pop("labels", None)
    if isinstance(batch, tuple) and len(batch) == 2:
        return batch[0], batch[1]
    if isinstance(batch, (torch.Tensor, list)):
        return batch, None
    raise TypeError(f"a batch must be a tensor, a dict of model inputs or a tuple (inputs, labels), "
                    f"got {type(batch).__name__}")


def _call(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def _default_forward(mode: str) -> ForwardFn:
    def forward(model: nn.Module, inputs: Any) -> torch.Tensor:
        out = _call(model, inputs)
        mask = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
        if mode == "logits":
            out = getattr(out, "logits", out)
            return out[0] if isinstance(out, (tuple, list)) else out
        hidden = getattr(out, "last_hidden_state", None)
        if hidden is None:
            hidden = out[0] if isinstance(out, (tuple, list)) else out
        return mean_pool(hidden, mask) if hidden.dim() == 3 else hidden
    return forward


def _teacher_tables(student: nn.Module, teacher: nn.Module) -> list[tuple[str, CompressedEmbedding, torch.Tensor]]:
    """Each compressed table of the student with the teacher's weight at the same module name."""
    from .surgery import compressed_tables  # surgery imports this module's names lazily too

    pairs = []
    for names, table in compressed_tables(student):
        weight = None
        for name in names:
            for candidate in (name, name.rpartition(".")[0]):  # a bag wrapper or tied head holds `.table`
                try:
                    module = teacher.get_submodule(candidate)
                except AttributeError:
                    continue
                w = getattr(module, "weight", None)
                if isinstance(w, torch.Tensor) and tuple(w.shape) == (table.num_embeddings, table.embedding_dim):
                    weight = w.detach()
                    break
            if weight is not None:
                break
        if weight is None:
            raise ValueError(f"table_weight > 0 but the teacher has no ({table.num_embeddings}, {table.embedding_dim}) "
                             f"table at {names}; set table_weight=0 or pass the uncompressed model as teacher")
        pairs.append((names[0], table, weight))
    return pairs


def _batch_stream(batches: Iterable[Any], epoch: int, position: int) -> Iterator[tuple[int, int, Any]]:
    """(epoch, position after this batch, batch), epoch after epoch, skipping ``position`` batches first."""
    while True:
        count = 0
        for count, batch in enumerate(iter(batches), start=1):
            if count <= position:
                continue
            yield epoch, count, batch
        if count == 0:
            raise ValueError("the batches ran out: pass a re-iterable (a list or a DataLoader), not a one-shot "
                             "iterator, or fewer steps")
        epoch, position = epoch + 1, 0


@dataclass(frozen=True)
class DistillConfig(Config):
    """The settings of one :func:`distill` run (keywords of ``distill`` are these fields).

        >>> config = DistillConfig.parse("temperature=4,alpha=0.9")
        >>> config.temperature, DistillConfig.parse(config.to_spec()) == config
        (4.0, True)
    """

    mode: Literal["logits", "outputs"] = field(default="logits", metadata={
        "help": "logits: T^2-scaled KL on softmax(logits / temperature), mixed with the cross-entropy on labels "
                "as alpha * KD + (1 - alpha) * CE when a batch has labels; "
                "outputs: output_loss between pooled outputs"})
    temperature: float = field(default=2.0, metadata={"help": "softmax temperature T of the logit loss"})
    alpha: float = field(default=0.5, metadata={"help": "weight of the distillation term against the task loss",
                                                "min": 0.0, "max": 1.0})
    table_weight: float = field(default=0.0, metadata={
        "help": "weight of the MSE between each compressed table and the teacher's table at the same name",
        "min": 0.0})
    output_loss: Literal["cosine", "mse"] = field(default="cosine", metadata={
        "help": "outputs mode: 1 - cosine, or MSE, between pooled outputs"})
    steps: int | None = field(default=None, metadata={
        "help": "optimizer steps; none = epochs * len(batches)", "min": 1})
    epochs: int = field(default=1, metadata={"help": "passes over the batches when steps is none", "min": 1})
    lr: float = field(default=1e-3, metadata={"help": "Adam learning rate", "min": 0.0})
    schedule: Literal["cosine", "constant"] = field(default="cosine", metadata={"help": "learning-rate schedule"})
    max_grad_norm: float | None = field(default=1.0, metadata={
        "help": "gradient-norm clipping; none = no clipping", "min": 0.0})
    train: Literal["tables", "all"] = field(default="tables", metadata={
        "help": "tables: only the compressed tables (the rest stays in eval mode); all: the whole student"})
    table_rows: int = field(default=4096, metadata={"help": "random rows per step of the table loss", "min": 1})
    seed: int = field(default=0, metadata={"help": "seed of the run's random draws"})
    checkpoint_every: int = field(default=100, metadata={"help": "steps between checkpoints", "min": 1})
    resume: bool = field(default=True, metadata={"help": "continue from an existing checkpoint"})

    @classmethod
    def describe(cls) -> str:
        return "distill settings"

    def validate(self) -> None:
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise SpecError(f"distill settings: temperature must be > 0, got {self.temperature}")


def distill(
    student: nn.Module,
    teacher: nn.Module,
    batches: Iterable[Any],
    config: "DistillConfig | str | Mapping[str, Any] | None" = None,
    *,
    forward_fn: ForwardFn | None = None,
    checkpoint: "str | Path | None" = None,
    progress: bool | None = None,
    **options: Any,
) -> DistillResult:
    """Fine-tune ``student`` (compressed) to match ``teacher`` (uncompressed), in place.

    Args:
        student, teacher: the compressed model and the original; the teacher is not changed.
        batches: re-iterable batches (see the module docstring); re-iterated for several epochs.
        config: a :class:`DistillConfig`, ``"key=value,..."`` or a dict; keyword ``options`` set
            the same fields (``mode``, ``temperature``, ``alpha``, ``table_weight``, ``steps``, ``lr``,
            ...; see :class:`DistillConfig`) and a misspelt name is an error naming the valid ones.
            ``train`` may also be an explicit list of parameters.
        forward_fn: ``forward_fn(model, inputs) -> tensor`` (logits, or pooled embeddings);
            default: call the model, take ``.logits`` or mean-pool ``last_hidden_state``.
        checkpoint: folder for safetensors + JSON checkpoints every ``checkpoint_every`` steps
            and at the end; with ``resume=True`` an existing checkpoint is continued.

    Returns:
        A :class:`DistillResult` with the loss of every step run. The method's auxiliary loss
        (``embcompress.aux_loss``) is always added.
    """
    from . import aux_loss

    explicit = options.get("train")
    train: "str | list[nn.Parameter]"
    if explicit is not None and not isinstance(explicit, str):
        options = {k: v for k, v in options.items() if k != "train"}
        train = list(explicit)
    cfg = DistillConfig.parse(config, **options)
    if explicit is None or isinstance(explicit, str):
        train = cfg.train
    mode, temperature, alpha, table_weight = cfg.mode, cfg.temperature, cfg.alpha, cfg.table_weight
    output_loss, steps, lr, schedule = cfg.output_loss, cfg.steps, cfg.lr, cfg.schedule
    max_grad_norm, table_rows, seed = cfg.max_grad_norm, cfg.table_rows, cfg.seed
    checkpoint_every, resume = cfg.checkpoint_every, cfg.resume
    if steps is None:
        if not hasattr(batches, "__len__"):
            raise ValueError("batches has no length: pass steps=N")
        steps = cfg.epochs * len(batches)  # type: ignore[arg-type]
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps} (are the batches empty?)")

    tables = [m for m in {id(m): m for m in student.modules() if isinstance(m, CompressedEmbedding)}.values()]
    if isinstance(train, str):
        if train == "tables":
            if not tables:
                raise ValueError("the student has no compressed table; run embcompress.compress_ first, "
                                 "or pass train='all'")
            params = list({id(p): p for t in tables for p in t.parameters() if p.requires_grad}.values())
        elif train == "all":
            params = [p for p in student.parameters() if p.requires_grad]
    else:
        params = list(train)
    if not params:
        raise ValueError("nothing to train: the selected parameters are empty or frozen")
    names = {id(p): n for n, p in student.named_parameters()}
    missing = [i for i, p in enumerate(params) if id(p) not in names]
    if missing:
        raise ValueError(f"parameters at positions {missing} of `train` are not parameters of the student")
    param_names = [names[id(p)] for p in params]
    table_pairs = _teacher_tables(student, teacher) if table_weight > 0 else []
    forward = forward_fn or _default_forward(mode)

    optimizer = torch.optim.Adam(params, lr=lr)
    rows_generator = torch.Generator().manual_seed(seed + 1)
    settings = {"mode": mode, "temperature": temperature, "alpha": alpha, "table_weight": table_weight,
                "output_loss": output_loss, "steps": steps, "lr": lr, "schedule": schedule,
                "max_grad_norm": max_grad_norm, "table_rows": table_rows, "seed": seed, "params": param_names}
    folder = Path(checkpoint) if checkpoint is not None else None
    start, epoch, position = 0, 0, 0
    losses: list[float] = []

    was_training = student.training
    teacher_was_training = teacher.training
    teacher.eval()
    started = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if folder is not None and resume and (folder / CHECKPOINT_NAME).is_file():
            start, epoch, position, losses = _load_checkpoint(folder, student, optimizer, rows_generator, settings)
            log.info("distill resumes from %s at step %d of %d", folder, start, steps)
        if train == "all" or not isinstance(train, str):
            student.train()
        else:
            student.eval()  # frozen parts: no dropout noise in the target the tables must match
            for table in tables:
                table.train()
        stream = _batch_stream(batches, epoch, position)
        bar = progress_bar(range(start, steps), desc="distill", total=steps - start, enabled=progress)
        try:
            for step in bar:
                epoch, position, batch = next(stream)
                inputs, labels = _split_batch(batch)
                with torch.no_grad():
                    target = forward(teacher, inputs)
                output = forward(student, inputs)
                if mode == "logits":
                    loss = _logit_loss(output, target, labels, temperature, alpha)
                elif output_loss == "cosine":
                    loss = (1 - F.cosine_similarity(output, target.to(output.dtype), dim=-1)).mean()
                else:
                    loss = F.mse_loss(output, target.to(output.dtype))
                for _, table, weight in table_pairs:
                    rows = torch.randint(0, table.num_embeddings, (min(table_rows, table.num_embeddings),),
                                         generator=rows_generator).to(weight.device)
                    loss = loss + table_weight * F.mse_loss(table(rows), weight[rows].to(torch.float32))
                loss = loss + aux_loss(student).to(loss.device)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"distill: the loss became {loss.item()} at step {step}; lower lr "
                                             f"(now {lr}) or set max_grad_norm")
                for group in optimizer.param_groups:
                    group["lr"] = _lr_at(step, steps, lr, schedule)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
                optimizer.step()
                losses.append(float(loss.detach()))
                if hasattr(bar, "set_postfix"):
                    bar.set_postfix(loss=f"{losses[-1]:.4g}", refresh=False)
                done = step + 1
                if folder is not None and (done % checkpoint_every == 0 or done == steps):
                    _save_checkpoint(folder, student, optimizer, rows_generator, settings, done, epoch, position,
                                     losses)
        finally:
            student.train(was_training)
            teacher.train(teacher_was_training)
    return DistillResult(steps=steps, start_step=start, losses=losses[start:] if len(losses) > start else [],
                         seconds=time.perf_counter() - started)


def _logit_loss(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor | None,
                temperature: float, alpha: float) -> torch.Tensor:
    if labels is None:
        return distillation_loss(student, teacher, temperature)
    flat_s = student.reshape(-1, student.shape[-1])
    flat_t = teacher.reshape(-1, teacher.shape[-1])
    flat_y = labels.reshape(-1).long().to(flat_s.device)
    if flat_y.numel() != flat_s.shape[0]:
        raise ValueError(f"labels have {flat_y.numel()} entries but the logits have {flat_s.shape[0]} rows "
                         f"(logits {tuple(student.shape)}, labels {tuple(labels.shape)})")
    keep = flat_y != -100
    kd = distillation_loss(flat_s[keep], flat_t[keep], temperature)
    return alpha * kd + (1 - alpha) * F.cross_entropy(flat_s[keep], flat_y[keep])


def _lr_at(step: int, steps: int, lr: float, schedule: str) -> float:
    if schedule == "constant":
        return lr
    return lr * 0.5 * (1 + math.cos(math.pi * step / steps))


# -- checkpoints ---------------------------------------------------------------------------------
def _save_checkpoint(folder: Path, student: nn.Module, optimizer: torch.optim.Optimizer,
                     rows_generator: torch.Generator, settings: dict[str, Any], step: int, epoch: int,
                     position: int, losses: list[float]) -> None:
    params = dict(student.named_parameters())
    tensors: dict[str, torch.Tensor] = {f"param.{n}": params[n] for n in settings["params"]}
    tensors.update({f"buffer.{n}": b for n, b in student.named_buffers()})
    state = optimizer.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    for index, entries in state["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{index}.{key}"] = value
            else:
                scalars.setdefault(str(index), {})[key] = value
    tensors["rng.torch"] = torch.get_rng_state()
    tensors["rng.rows"] = rows_generator.get_state()
    fields = {"step": step, "epoch": epoch, "position": position, "losses": losses, "settings": json_ready(settings),
              "optimizer_scalars": json_ready(scalars)}
    # One io bundle: tensors under a new name first, then the JSON pointing at them, so a crash in
    # between leaves the previous checkpoint whole; older state files are swept afterwards.
    write_folder_bundle(folder, CHECKPOINT_NAME, f"state-{step:08d}.safetensors", "checkpoint", fields, tensors,
                        overwrite=True, sweep="state-*.safetensors")


def _load_checkpoint(folder: Path, student: nn.Module, optimizer: torch.optim.Optimizer,
                     rows_generator: torch.Generator, settings: dict[str, Any]) -> tuple[int, int, int, list[float]]:
    path = folder / CHECKPOINT_NAME
    hint = "; delete the folder or pass resume=False"
    try:
        header, tensors = read_folder_bundle(folder, CHECKPOINT_NAME, ("checkpoint",))
    except ArtifactError as exc:
        raise ArtifactError(f"{exc}{hint}") from None
    try:
        steps = json_int(header, "step", 0, 1 << 62)
        epoch = json_int(header, "epoch", 0, 1 << 62)
        position = json_int(header, "position", 0, 1 << 62)
        losses = header.get("losses")
        if not isinstance(losses, list) or not all(isinstance(v, (int, float)) for v in losses):
            raise ValueError("losses must be a list of numbers")
        saved = json_object(header, "settings")
        scalars = json_object(header, "optimizer_scalars")
        assert saved is not None and scalars is not None
        if not all(k.isdigit() and isinstance(v, dict) for k, v in scalars.items()):
            raise ValueError("optimizer_scalars must map parameter indices to objects")
        for key in ("rng.torch", "rng.rows"):
            if key not in tensors or tensors[key].dtype != torch.uint8:
                raise ValueError(f"the tensor {key!r} (a uint8 RNG state) is missing")
    except ValueError as exc:
        raise ArtifactError(f"{path}: invalid header: {exc}{hint}") from None
    settings = json_ready(settings)  # compared as stored: tuples are lists in JSON
    changed = sorted(k for k in settings if saved.get(k) != settings[k])
    if changed:
        detail = ", ".join(f"{k}: {saved.get(k)!r} -> {settings[k]!r}" for k in changed)
        raise ValueError(f"the checkpoint in {folder} was made with other settings ({detail}); "
                         "pass resume=False (or another checkpoint folder) to start over")
    params = dict(student.named_parameters())
    buffers = dict(student.named_buffers())
    try:
        with torch.no_grad():
            for key, tensor in tensors.items():
                kind, _, name = key.partition(".")
                if kind == "param":
                    params[name].copy_(tensor)
                elif kind == "buffer" and name in buffers and buffers[name] is not None:
                    buffers[name].copy_(tensor)
        state: dict[int, dict[str, Any]] = {}
        for key, tensor in tensors.items():
            if key.startswith("optim."):
                _, index, name = key.split(".", 2)
                state.setdefault(int(index), {})[name] = tensor
        for index, entries in scalars.items():
            state.setdefault(int(index), {}).update(entries)
        groups = optimizer.state_dict()["param_groups"]
        optimizer.load_state_dict({"state": state, "param_groups": groups})
        torch.set_rng_state(tensors["rng.torch"])
        rows_generator.set_state(tensors["rng.rows"])
    except (KeyError, RuntimeError, ValueError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ArtifactError(f"{path}: the checkpoint does not fit this student ({reason}){hint}") from None
    return steps, epoch, position, [float(v) for v in losses]
