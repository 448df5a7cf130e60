"""Distillation of a compressed student from its uncompressed teacher."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import embcompress
from embcompress.distill import distillation_loss


class TinyClassifier(nn.Module):
    def __init__(self, vocab=64, dim=16, classes=5):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.out = nn.Linear(dim, classes)

    def forward(self, ids):
        return self.out(torch.tanh(self.emb(ids).mean(1)))


class TinyEncoder(nn.Module):
    def __init__(self, vocab=64, dim=16):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, input_ids, attention_mask):
        return torch.tanh(self.proj(self.emb(input_ids)))  # (B, L, d): distill mean-pools it


def make_batches(n=8, labels=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 64, (16, 6), generator=g)
        out.append((ids, torch.randint(0, 5, (16,), generator=g)) if labels else ids)
    return out


def student_and_teacher(spec="lowrank:rank=4", init="pretrained"):
    torch.manual_seed(0)
    teacher = TinyClassifier()
    student = copy.deepcopy(teacher)
    embcompress.compress_(student, spec, init=init)
    return student, teacher


def kd_distance(student, teacher, batches):
    with torch.no_grad():
        return sum(float(distillation_loss(student(x), teacher(x), 1.0)) for x in batches) / len(batches)


def test_logit_distillation_lowers_the_distance_to_the_teacher():
    student, teacher = student_and_teacher()
    batches = make_batches(labels=False)
    teacher_state = copy.deepcopy(teacher.state_dict())
    before = kd_distance(student, teacher, batches)
    result = embcompress.distill(student, teacher, batches, epochs=20, lr=0.05)
    after = kd_distance(student, teacher, batches)
    assert after < 0.3 * before, (before, after)
    assert result.steps == 160 and len(result.losses) == 160
    assert result.final_loss < 0.5 * result.first_loss
    assert all(torch.equal(teacher_state[k], v) for k, v in teacher.state_dict().items())
    assert torch.equal(student.out.weight, teacher.out.weight)  # train="tables": only the table moves


def test_table_term_pulls_the_table_toward_the_teachers():
    student, teacher = student_and_teacher(init="random")
    distance = lambda: float((student.emb.materialize() - teacher.emb.weight.detach()).pow(2).mean())  # noqa: E731
    before = distance()
    embcompress.distill(student, teacher, make_batches(labels=False), epochs=5, lr=0.05, table_weight=10.0)
    assert distance() < 0.6 * before


def test_output_distillation_for_encoders():
    torch.manual_seed(0)
    teacher = TinyEncoder()
    student = copy.deepcopy(teacher)
    embcompress.compress_(student, "lowrank:rank=4")
    batches = [{"input_ids": x, "attention_mask": torch.ones_like(x)} for x in make_batches(labels=False)]

    def cosine(model):
        with torch.no_grad():
            return sum(F.cosine_similarity(model(**b).mean(1), teacher(**b).mean(1)).mean().item()
                       for b in batches) / len(batches)

    before = cosine(student)
    embcompress.distill(student, teacher, batches, mode="outputs", steps=80, lr=0.05)
    assert 1 - cosine(student) < 0.75 * (1 - before)


def test_task_loss_labels_and_validation():
    student, teacher = student_and_teacher()
    with pytest.raises(ValueError, match="alpha"):
        embcompress.distill(student, teacher, make_batches(), alpha=1.5)
    with pytest.raises(ValueError, match="steps=N"):
        embcompress.distill(student, teacher, iter(make_batches()))
    with pytest.raises(ValueError, match="ran out"):
        embcompress.distill(student, teacher, iter(make_batches(2)), steps=5)
    with pytest.raises(ValueError, match="no compressed table"):
        embcompress.distill(TinyClassifier(), teacher, make_batches())
    # alpha=0: pure task loss; the student learns the labels.
    result = embcompress.distill(student, teacher, make_batches(), alpha=0.0, epochs=3, lr=0.05, train="all")
    assert result.final_loss < result.first_loss


def test_checkpoint_resume_matches_an_uninterrupted_run(tmp_path):
    batches = make_batches(5)
    options = dict(steps=12, lr=0.05, table_weight=0.1, seed=3, checkpoint_every=4)
    full_student, teacher = student_and_teacher("dpq:variant=sx,groups=4,codewords=8", init="random")
    full = embcompress.distill(full_student, teacher, batches, checkpoint=tmp_path / "a", **options)

    student, teacher = student_and_teacher("dpq:variant=sx,groups=4,codewords=8", init="random")

    class Interrupt(Exception):
        pass

    def interrupted():  # fails on its 7th batch: the run stops after the step-4 checkpoint
        for i, b in enumerate(batches * 3):
            if i == 6:
                raise Interrupt
            yield b

    class Once:
        def __iter__(self):
            return interrupted()

    with pytest.raises(Interrupt):
        embcompress.distill(student, teacher, Once(), checkpoint=tmp_path / "b", **options)
    header = json.loads((tmp_path / "b" / "distill.json").read_text())
    assert header["step"] == 4 and header["tensors"] == "state-00000004.safetensors"
    resumed = embcompress.distill(student, teacher, batches, checkpoint=tmp_path / "b", **options)
    assert resumed.start_step == 4 and len(resumed.losses) == 8
    assert resumed.losses == pytest.approx(full.losses[4:], rel=1e-5, abs=1e-6)
    student.eval(), full_student.eval()
    ids = torch.arange(64)
    assert torch.allclose(student.emb(ids), full_student.emb(ids), atol=1e-5)
    with pytest.raises(ValueError, match="other settings"):
        embcompress.distill(student, teacher, batches, checkpoint=tmp_path / "b", **{**options, "lr": 0.1})
