"""Caption tests run single-threaded: tiny decoders gain nothing from a second OpenMP thread, and on a
shared machine an oversubscribed thread pool made an 80-step test 20x slower."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # py:caption_testutils:tiny_clip for subprocesses too


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
