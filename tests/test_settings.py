"""Typed fit and distillation settings: every option is checked by name, and fitted tables record them."""

import dataclasses
import re
import warnings

import pytest
import torch
from torch import nn

import embcompress
from embcompress.config import FitConfig, split_spec
from embcompress.distill import DistillConfig
from helpers import synthetic_table
from method_cases import CASES

METHODS = embcompress.list_methods()


def first_spec(method: str) -> str:
    return CASES[method][0][0]


def valid_keys_named(message: str, names: list[str]) -> bool:
    listed = re.search(r"valid keys: (.*)$", message)
    return listed is not None and [k.strip() for k in listed.group(1).split(",")] == names


@pytest.mark.parametrize("method", METHODS)
def test_a_misspelt_fit_option_names_the_valid_ones(method):
    fit = embcompress.get_method(method).Fit
    names = [f.name for f in dataclasses.fields(fit)]
    weight = synthetic_table(64, 24)
    for call in (lambda: embcompress.from_pretrained(weight, first_spec(method), stpes=3),
                 lambda: embcompress.from_pretrained(weight, first_spec(method), fit="stpes=3"),
                 lambda: embcompress.build(first_spec(method), 64, 24).fit(weight, {"stpes": 3})):
        with pytest.raises(embcompress.SpecError, match=r"unknown key 'stpes'.*did you mean 'steps'") as caught:
            call()
        assert valid_keys_named(str(caught.value), names), str(caught.value)


@pytest.mark.parametrize("method", METHODS)
def test_fit_settings_are_typed_and_print_canonically(method):
    fit = embcompress.get_method(method).Fit
    default = fit()
    assert fit.parse(default.to_spec()) == default
    assert issubclass(fit, FitConfig) and fit.method == method
    with pytest.raises(embcompress.SpecError, match="steps"):
        fit.parse(steps=-1)
    with pytest.raises(embcompress.SpecError, match="integer"):
        fit.parse("steps=many")


@pytest.mark.parametrize("method", METHODS)
def test_fit_settings_round_trip(method):
    weight = synthetic_table(64, 24)
    torch.manual_seed(3)
    table = embcompress.from_pretrained(weight, first_spec(method), steps=2)
    settings = table.fit_settings
    assert settings is not None and settings["steps"] == 2
    assert settings.get("seed", 0) is not None  # a drawn seed is recorded, not "none"
    fit = type(table).Fit
    assert fit.parse(settings).to_dict() == settings
    assert fit.parse(fit.parse(settings).to_spec()).to_dict() == settings
    assert table.export().fit_settings == settings  # carried onto the deployed module
    # The recorded settings remake the same table, whatever the global generator does meanwhile.
    torch.manual_seed(99)
    again = embcompress.from_pretrained(weight, first_spec(method), fit=settings)
    torch.testing.assert_close(again.eval().materialize(), table.eval().materialize())
    assert again.fit_settings == settings


def test_fit_accepts_a_config_a_string_or_keywords():
    from embcompress.methods.pq import PQFit

    weight = synthetic_table(200, 16)
    by_string = embcompress.from_pretrained(weight, "pq:groups=4,codewords=8", fit="iters=30,seed=5")
    by_config = embcompress.from_pretrained(weight, "pq:groups=4,codewords=8", fit=PQFit(iters=30, seed=5))
    by_keywords = embcompress.from_pretrained(weight, "pq:groups=4,codewords=8", iters=30, seed=5)
    assert by_string.fit_settings == by_config.fit_settings == by_keywords.fit_settings == \
        {"steps": 0, "iters": 30, "sample": 0, "seed": 5}
    torch.testing.assert_close(by_string.materialize(), by_keywords.materialize())
    with pytest.raises(embcompress.SpecError, match="iters must be >= 0"):
        embcompress.from_pretrained(weight, "pq:groups=4,codewords=8", fit="iters=-1")
    with pytest.raises(embcompress.SpecError, match="expected pq fit settings"):
        embcompress.from_pretrained(weight, "pq:groups=4,codewords=8", fit=embcompress.get_method("dpq").Fit())


def test_pq_spec_with_the_retired_iters_key_still_parses():
    with pytest.warns(DeprecationWarning, match="fit setting now"):
        config = embcompress.parse_spec("pq:groups=4,codewords=16,iters=25")
    assert config == embcompress.parse_spec("pq:groups=4,codewords=16")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert "iters" not in config.to_spec()


def test_compress_checks_fit_options_per_method():
    model = nn.Sequential(nn.Embedding(40, 8))
    with pytest.raises(embcompress.SpecError, match=r"unknown key 'stpes' for dpq fit settings.*valid keys: steps"):
        embcompress.compress_(model, "lowrank:rank=4", fit_options={"dpq": {"stpes": 3}})
    with pytest.raises(embcompress.SpecError, match=r"unknown key 'iters' for lowrank fit settings"):
        embcompress.compress_(model, "lowrank:rank=4", fit_options={"iters": 3})
    report = embcompress.compress_(model, "pq:groups=2,codewords=4", fit_options={"pq": {"iters": 3}, "steps": 1})
    assert model[0].fit_settings["iters"] == 3 and report.tables


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(30, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.tok(ids).mean(1))


@pytest.mark.parametrize("name", [f.name for f in dataclasses.fields(DistillConfig)])
def test_a_misspelt_distill_option_names_the_valid_ones(name):
    teacher = _Tiny()
    student = _Tiny()
    student.load_state_dict(teacher.state_dict())
    embcompress.compress_(student, "lowrank:rank=2")
    batches = [torch.randint(0, 30, (4, 5))]
    typo = name + name[-1]  # a doubled last letter
    pattern = rf"unknown key '{typo}' for distill settings.*did you mean '{name}'"
    with pytest.raises(embcompress.SpecError, match=pattern) as caught:
        embcompress.distill(student, teacher, batches, **{typo: getattr(DistillConfig(), name)})
    assert valid_keys_named(str(caught.value), [f.name for f in dataclasses.fields(DistillConfig)])


def test_distill_config_is_the_keywords():
    teacher = _Tiny()
    student = _Tiny()
    student.load_state_dict(teacher.state_dict())
    embcompress.compress_(student, "lowrank:rank=2")
    batches = [torch.randint(0, 30, (4, 5)) for _ in range(3)]
    torch.manual_seed(0)
    by_keywords = embcompress.distill(student, teacher, batches, steps=3, lr=0.01, temperature=3.0)
    student.load_state_dict(teacher.state_dict(), strict=False)
    config = DistillConfig(steps=3, lr=0.01, temperature=3.0)
    assert DistillConfig.parse(config.to_spec()) == config
    with pytest.raises(embcompress.SpecError, match="temperature must be > 0"):
        DistillConfig(temperature=0.0)
    with pytest.raises(embcompress.SpecError, match="not one of logits, outputs"):
        embcompress.distill(student, teacher, batches, mode="logit")
    assert len(by_keywords.losses) == 3


def test_one_spec_parser():
    assert split_spec("dpq:groups=8, codewords=4") == ("dpq", {"groups": 8, "codewords": 4})
    with pytest.raises(embcompress.SpecError, match="unknown key 'grups'"):
        split_spec("dpq:grups=8")


def test_cli_refuses_a_method_that_disagrees_with_the_spec(tmp_path, capsys):
    from embcompress.cli import main

    code = main(["compress", str(tmp_path / "missing.npy"), "-m", "dp", "--spec", "dpq:groups=4",
                 "-o", str(tmp_path / "out.emb")])
    assert code == 2 and "name different methods" in capsys.readouterr().err
    code = main(["compress", str(tmp_path / "missing.npy"), "-m", "pq", "--fit", "iter=3",
                 "-o", str(tmp_path / "out.emb")])
    assert code == 2 and "did you mean 'iters'" in capsys.readouterr().err
    assert not (tmp_path / "out.emb").exists()
