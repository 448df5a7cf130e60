"""The budget planner: a method and a size per table, chosen by measured quality, within one budget."""

import pytest
import torch

import embcompress
from embcompress.config import SpecError
from embcompress.planner import (Candidate, allocate, pareto_front, parse_budget, plan_budget,
                                 weighted_relative_error)

from helpers import synthetic_table


def test_parse_budget_forms():
    assert parse_budget("10x") == {"ratio": 10.0}
    assert parse_budget("2MB") == {"bytes": 2 << 20}
    assert parse_budget("80bpr") == {"bits_per_row": 80.0}
    assert parse_budget(1234) == {"bytes": 1234}
    assert parse_budget({"ratio": 4}) == {"ratio": 4}
    with pytest.raises(ValueError, match="use e.g. '10x'"):
        parse_budget("ten times")


def test_weighted_error_ignores_rows_of_zero_weight():
    target = torch.randn(10, 4)
    approx = target.clone()
    approx[3] += 5.0
    weights = torch.ones(10)
    weights[3] = 0
    assert weighted_relative_error(approx, target, weights) == 0
    assert weighted_relative_error(approx, target) > 0


def test_pareto_front_and_greedy_allocation_spend_bytes_where_they_help_most():
    c = lambda m, b, e: Candidate(m, m, b, e, 0.0)  # noqa: E731
    front = pareto_front([c("a", 100, 0.5), c("b", 100, 0.4), c("a", 200, 0.45), c("a", 300, 0.1)])
    assert [(x.bytes, x.error) for x in front] == [(100, 0.4), (300, 0.1)]
    fronts = {"steep": [c("x", 100, 0.9), c("x", 200, 0.1)], "flat": [c("y", 100, 0.5), c("y", 200, 0.45)]}
    choice = allocate(fronts, {"steep": 0.5, "flat": 0.5}, limit=300)
    assert choice["steep"].bytes == 200 and choice["flat"].bytes == 100
    with pytest.raises(embcompress.SpecError, match="below the smallest measured settings"):
        allocate(fronts, {"steep": 0.5, "flat": 0.5}, limit=150)


def test_plan_fits_the_budget_and_explains_every_choice():
    tables = {"low_rank": synthetic_table(600, 32, rank=4, noise=0.01, seed=1),
              "noisy": torch.randn(300, 16, generator=torch.Generator().manual_seed(2))}
    plan = plan_budget(tables, ratio=5, methods=["scalar", "lowrank", "pq"], quick=True)
    dense = sum(w.numel() * 4 for w in tables.values())
    assert dense / 5 * 0.8 <= plan.total_bytes <= dense / 5
    assert plan.specs["low_rank"].startswith("lowrank")  # a rank-4 table is what a low-rank fit is for
    text = str(plan)
    for name in tables:
        assert name in text
    why = plan.tables[0].why_others_lost()
    assert set(why) == {"scalar", "pq"} and all(why.values())


def test_compress_with_a_budget_replaces_every_table_within_it():
    model = torch.nn.Sequential(torch.nn.Embedding(400, 32), torch.nn.Embedding(100, 8))
    with torch.no_grad():
        model[0].weight.copy_(synthetic_table(400, 32, rank=4, noise=0.01))
    report = embcompress.compress_(model, budget="6x", methods=["scalar", "lowrank", "pq"],
                                   fit_options={"steps": 50})
    assert len(report.tables) == 2 and report.bytes_after <= report.bytes_before / 6
    assert set(report.plan.specs) == {"0", "1"}
    assert [t.spec for t in report.tables] == [report.plan.specs["0"], report.plan.specs["1"]]
    assert "measured error" in str(report)
    with pytest.raises(embcompress.SpecError, match="with budget="):
        embcompress.compress_(torch.nn.Sequential(torch.nn.Embedding(10, 4)), {"0": "pq"}, budget="4x")


def test_specs_with_fixed_fields_are_candidates_of_their_own():
    g = torch.Generator().manual_seed(4)  # variance in directions that cut across every group of 4 dims
    table = torch.randn(3000, 3, generator=g) @ torch.randn(3, 16, generator=g)
    table += 0.05 * torch.randn(3000, 16, generator=g)
    plan = plan_budget({"t": table}, ratio=6, methods=["pq", "pq:rotation=pca"], quick=True)
    assert plan.tables[0].choice.method == "pq:rotation=pca" and "rotation=pca" in plan.specs["t"]
    assert set(plan.tables[0].why_others_lost()) == {"pq"}
    with pytest.raises(embcompress.SpecError, match="rotation='spin' is not one of none, pca"):
        plan_budget({"t": table}, ratio=6, methods=["pq:rotation=spin"])


def test_fit_time_reaches_every_budget_rule_the_planner_asks(monkeypatch):
    import embcompress.planner as planner

    asked = []
    real = planner.config_for_budget

    def recording(*args, **kwargs):
        asked.append(kwargs.get("fit_time"))
        return real(*args, **kwargs)

    monkeypatch.setattr(planner, "config_for_budget", recording)
    model = torch.nn.Sequential(torch.nn.Embedding(200, 16))
    embcompress.compress_(model, budget="6x", methods=["scalar", "pq"], fit_time=3)
    assert asked and set(asked) == {3}
    with pytest.raises(ValueError, match="fit_time= sizes the settings the planner chooses for budget="):
        embcompress.compress_(torch.nn.Sequential(torch.nn.Embedding(10, 4)), "pq", fit_time=3)
    with pytest.raises(ValueError, match="fit_time must be a positive finite number"):
        embcompress.compress_(torch.nn.Sequential(torch.nn.Embedding(50, 8)), budget="4x", methods=["pq"],
                              fit_time=0)


def tiny_llama(vocab=300, hidden=32, seed=0):
    """A tied-head Llama-style decoder built from a config (no download)."""
    transformers = pytest.importorskip("transformers", reason="needs the hf extra: pip install 'embcompress[hf]'")
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                      max_position_embeddings=64, tie_word_embeddings=True)
    return transformers.LlamaForCausalLM(config).eval()


def test_compress_model_cli_writes_what_load_pretrained_reads(tmp_path, capsys):
    from embcompress.cli import main

    model = tiny_llama()
    model.save_pretrained(tmp_path / "llama", safe_serialization=True)
    assert main(["-q", "compress-model", str(tmp_path / "llama"), "--ratio", "5", "--methods", "scalar", "lowrank",
                 "-o", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "model.embed_tokens" in printed and "measured error" in printed and "lm_head" in printed
    fresh = type(model).from_pretrained(tmp_path / "llama").eval()
    report = embcompress.load_pretrained(fresh, tmp_path / "out")
    assert report.tables[0].tied_heads == ["lm_head"] and report.ratio >= 5
    ids = torch.randint(0, 300, (2, 9))
    with torch.no_grad():
        logits = fresh(ids).logits
    assert logits.shape == (2, 9, 300) and torch.isfinite(logits).all()
    assert main(["-q", "compress-model", str(tmp_path / "llama"), "-o", str(tmp_path / "x")]) == 2
    assert "give a budget" in capsys.readouterr().err
    assert main(["-q", "compress-model", str(tmp_path / "llama"), "--ratio", "5", "--fit-time", "-2",
                 "-o", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "--fit-time" in err and "positive finite number" in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()


WEIGHTED_SPECS = ["pq:groups=4,codewords=8", "lowrank:rank=3", "dpq:groups=4,codewords=8",
                  "dpq:variant=vq,groups=4,codewords=8", "codes:books=2,codewords=8"]


@pytest.mark.parametrize("spec", WEIGHTED_SPECS)
def test_row_weights_move_the_error_onto_rare_rows(spec):
    weight = torch.randn(400, 16, generator=torch.Generator().manual_seed(3))
    counts = torch.ones(400)
    counts[:40] = 1000.0  # 40 frequent rows
    torch.manual_seed(0)
    plain = embcompress.from_pretrained(weight, spec).materialize()
    torch.manual_seed(0)
    weighted = embcompress.from_pretrained(weight, spec, row_weights=counts).materialize()
    frequent = lambda approx: float((approx - weight)[:40].pow(2).mean())  # noqa: E731
    assert frequent(weighted) < 0.85 * frequent(plain)
    assert weighted_relative_error(weighted, weight, counts) < weighted_relative_error(plain, weight, counts)


def test_compress_passes_row_weights_to_fits_that_take_them():
    weight = torch.randn(300, 8, generator=torch.Generator().manual_seed(4))
    counts = torch.ones(300)
    counts[:30] = 1000.0
    errors = {}
    for weighted in (False, True):
        model = torch.nn.Sequential(torch.nn.Embedding(300, 8))
        with torch.no_grad():
            model[0].weight.copy_(weight)
        torch.manual_seed(0)
        embcompress.compress_(model, "lowrank:rank=2", row_weights={"0": counts} if weighted else None)
        errors[weighted] = float((model[0].materialize() - weight)[:30].pow(2).mean())
    assert errors[True] < 0.9 * errors[False]


def test_row_weights_are_checked_and_never_recorded_as_fit_settings():
    weight = torch.randn(50, 8, generator=torch.Generator().manual_seed(5))
    counts = torch.ones(50)
    table = embcompress.from_pretrained(weight, "pq:groups=2,codewords=4", row_weights=counts)
    assert "row_weights" not in table.fit_settings and "row_weights" not in table.export().fit_settings
    with pytest.raises(ValueError, match="scalar takes no row_weights; methods whose fit does: codes, dpq, lowrank, "
                                         "pq"):
        embcompress.from_pretrained(weight, "scalar:bits=8", row_weights=counts)
    with pytest.raises(ValueError, match=r"row_weights must be a \(50,\) tensor"):
        embcompress.from_pretrained(weight, "lowrank:rank=2", row_weights=torch.ones(49))
    with pytest.raises(ValueError, match="finite and >= 0"):
        embcompress.from_pretrained(weight, "lowrank:rank=2", row_weights=-counts)
    with pytest.raises(SpecError, match="row_weights"):  # a tensor, not a setting: not accepted as a fit option
        embcompress.from_pretrained(weight, "pq:groups=2,codewords=4", fit={"row_weights": 1})


def _seeded(spec):
    """A fixed fit seed for the methods whose fit draws random numbers (lowrank's SVD draws none)."""
    return {"seed": 0} if "seed" in embcompress.get_method(spec.split(":")[0]).Fit.help() else {}


@pytest.mark.parametrize("spec", ["pq:groups=4,codewords=2", "lowrank:rank=1", "dpq:groups=4,codewords=2",
                                  "dpq:variant=vq,groups=4,codewords=2", "codes:books=1,codewords=2"])
def test_a_row_of_weight_zero_is_ignored_by_the_fit(spec):
    """A far outlier takes one of two codewords (the rank-1 direction) in a plain fit; at weight 0 the
    fit is as good on the other rows as a fit to the table without it."""
    weight = synthetic_table(300, 16, rank=6, noise=0.05, seed=6)
    outlier = weight.clone()
    outlier[0] = 60 * weight.abs().max()  # far from every other row
    weights = torch.ones(300)
    weights[0] = 0
    others = lambda approx, target: float((approx - target)[1:].pow(2).sum() / target[1:].pow(2).sum())  # noqa: E731
    errors = {}
    for name, table, row_weights in (("clean", weight[1:], None), ("plain", outlier, None),
                                     ("zero", outlier, weights)):
        torch.manual_seed(0)
        approx = embcompress.from_pretrained(table, spec, row_weights=row_weights, **_seeded(spec)).materialize()
        errors[name] = float((approx - table).pow(2).sum() / table.pow(2).sum()) if name == "clean" else \
            others(approx, table)
    assert errors["zero"] < 0.8 * errors["plain"]
    assert errors["zero"] <= 1.25 * errors["clean"] + 1e-4


@pytest.mark.parametrize("spec", WEIGHTED_SPECS)
def test_uniform_row_weights_give_the_unweighted_fit(spec):
    weight = synthetic_table(200, 16, rank=5, noise=0.05, seed=7)
    plain = embcompress.from_pretrained(weight, spec, **_seeded(spec)).materialize()
    uniform = embcompress.from_pretrained(weight, spec, row_weights=torch.full((200,), 2.5),
                                          **_seeded(spec)).materialize()
    torch.testing.assert_close(uniform, plain, rtol=1e-4, atol=1e-5)
