import os

import pytest
import torch

os.environ.setdefault("EMBCOMPRESS_QUIET", "1")
# The suite's tensors are small: one thread avoids oversubscribing a shared 2-core machine.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
