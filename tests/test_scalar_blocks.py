"""Block-wise scalar quantization (llama.cpp Q4_0/Q4_1-style scales per block of values)."""

import pytest
import torch

import embcompress
from embcompress.budget import config_for_budget
from embcompress.frozen.scalar import FrozenScalar, block_codes, block_decode
from embcompress.methods.scalar import ScalarEmbedding

from helpers import relative_mse


def heavy_tailed(rows=512, dim=96, seed=0):
    """Rows whose columns differ in scale by 30x, as LLM token tables do (outlier channels)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, dim, generator=g) * torch.logspace(-1, 0.5, dim)[torch.randperm(dim, generator=g)]


@pytest.mark.parametrize("bits", [8, 4, 3, 2])
def test_blocks_beat_one_scale_per_row(bits):
    weight = heavy_tailed()
    per_row = embcompress.from_pretrained(weight, f"scalar:bits={bits},offset=true").materialize()
    blocked = embcompress.from_pretrained(weight, f"scalar:bits={bits},block=32,offset=true").materialize()
    assert relative_mse(blocked, weight) < 0.8 * relative_mse(per_row, weight)


def test_symmetric_codes_use_every_level_and_hit_the_extreme_exactly():
    weight = torch.tensor([[0.5, -2.0, 1.0, 0.25], [3.0, 1.0, -1.0, 0.0]])
    codes, scale, minimum = block_codes(weight, 3, 2, offset=False)
    assert minimum is None and scale.dtype == torch.float16 and scale.shape == (2, 2)
    decoded = block_decode(codes, scale, None, 3, 2)
    assert decoded[0, 1] == -2.0 and decoded[1, 0] == 3.0  # each block's extreme is exact
    assert codes.min() >= 0 and codes.max() <= 7 and 0 in codes.tolist()[0] + codes.tolist()[1]


def test_offset_keeps_the_last_partial_block_range():
    weight = torch.tensor([[5.0, 6.0, 7.0, 5.5, 6.5]])  # block 2: the tail block holds one value
    codes, scale, minimum = block_codes(weight, 2, 2, offset=True)
    decoded = block_decode(codes, scale, minimum, 2, 2)
    torch.testing.assert_close(decoded[0, 4], weight[0, 4], atol=1e-2, rtol=0)


def test_byte_count_and_budget():
    rows, dim = 1000, 96
    for spec in ("scalar:bits=3,block=32", "scalar:bits=2,block=64,offset=true", "scalar:bits=4,block=0,offset=true"):
        config = embcompress.parse_spec(spec)
        table = embcompress.build(config, rows, dim)
        assert table.num_bytes() == ScalarEmbedding.expected_bytes(config, rows, dim)
    # 3.2 bits per value at 10x: 3-bit codes with one fp16 scale per 128 values (3.125 bits) fit.
    config = config_for_budget("scalar", rows, dim, ratio=10)
    assert (config.bits, config.block, config.offset) == (3, 128, False)
    assert config_for_budget("scalar:block=0", rows, dim, ratio=7).bits == 4


def test_zero_rows_and_old_artifacts(tmp_path):
    weight = torch.zeros(4, 8)
    frozen = embcompress.from_pretrained(weight, "scalar:bits=2,block=4").export()
    assert frozen.materialize().abs().max() == 0
    per_row = FrozenScalar.from_weight(torch.randn(4, 8), 4)
    assert per_row.metadata() == {"bits": 4}  # the original per-row header is unchanged
    loaded = embcompress.load(embcompress.save(frozen, tmp_path / "z.emb"))
    assert loaded.metadata() == {"bits": 2, "block": 4}


def test_invalid_settings_name_the_fix():
    with pytest.raises(embcompress.SpecError, match="block and offset apply to bits 8, 4, 3 and 2"):
        embcompress.parse_spec("scalar:bits=16,block=32")
    with pytest.raises(embcompress.SpecError, match="block must be >= 0"):
        embcompress.parse_spec("scalar:block=-1")
