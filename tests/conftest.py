import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import random

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def _seeded_rngs():
    """Every test starts from the same global RNG state, so its random inputs do not depend on which
    tests ran before it (a test selection or a new test elsewhere cannot turn a pass into a failure)."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield
