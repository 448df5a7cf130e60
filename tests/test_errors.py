"""Bad input gets a clear error naming the problem and a valid alternative."""

import math

import pytest
import torch

import embcompress
from embcompress import SpecError
from method_cases import CASES

SPECS = [CASES[name][0][0] for name in embcompress.list_methods()]


@pytest.mark.parametrize("spec", SPECS)
def test_bad_ids(spec):
    table = embcompress.build(spec, 50, 8)
    frozen = table.export()
    for module in (table, frozen):
        with pytest.raises(IndexError, match=r"out of range.*0\.\.49"):
            module(torch.tensor([1, 50]))
        with pytest.raises(IndexError, match="negative id -1"):
            module(torch.tensor([-1, 2]))
        with pytest.raises(TypeError, match=r"integer dtype.*ids.long\(\)"):
            module(torch.tensor([1.0, 2.0]))
        with pytest.raises(TypeError, match="torch.Tensor"):
            module([1, 2])


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_weights(spec, bad):
    weight = torch.randn(40, 8)
    weight[7, 3] = bad
    with pytest.raises(ValueError, match=r"NaN or infinite.*row 7, column 3"):
        embcompress.from_pretrained(weight, spec)


@pytest.mark.parametrize("spec", SPECS)
def test_mismatched_shapes(spec):
    table = embcompress.build(spec, 40, 8)
    with pytest.raises(ValueError, match=r"shape \(40, 6\).*\(40, 8\)"):
        table.fit(torch.randn(40, 6))
    with pytest.raises(ValueError, match="2-D"):
        embcompress.from_pretrained(torch.randn(40), spec)
    with pytest.raises(ValueError, match="num_embeddings must be a positive integer"):
        embcompress.build(spec, 0, 8)


def test_unknown_and_misspelt_spec_keys():
    with pytest.raises(SpecError, match=r"unknown key 'bucket'.*did you mean 'buckets'.*valid keys: buckets"):
        embcompress.build("hash:bucket=10", 100, 8)
    with pytest.raises(SpecError, match=r"unknown method 'hsah'.*did you mean 'hash'"):
        embcompress.build("hsah:buckets=10", 100, 8)
    with pytest.raises(SpecError, match="expected an integer"):
        embcompress.build("hash:buckets=ten", 100, 8)
    with pytest.raises(SpecError, match="not one of 16, 8, 4, 3, 2"):
        embcompress.build("scalar:bits=5", 100, 8)
    with pytest.raises(SpecError, match="expected key=value"):
        embcompress.build("hash:buckets", 100, 8)
    with pytest.raises(SpecError, match="given twice"):
        embcompress.build("hash:buckets=3,buckets=4", 100, 8)
    with pytest.raises(SpecError, match="unknown key 'foo'"):
        embcompress.parse_spec("scalar").replace(foo=1)


def test_config_type_mismatch_names_the_field():
    hash_class = embcompress.get_method("hash")
    with pytest.raises(SpecError, match="HashEmbedding needs a HashConfig.*got a config for 'scalar'"):
        hash_class(10, 4, "scalar")
