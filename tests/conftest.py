import os

import pytest
import torch

os.environ.setdefault("EMBCOMPRESS_QUIET", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
