"""Shared fixtures: device/dtype, seeding, and the path to ../shared/data (skipped when absent)."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("FUSION_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def shared_data_dir(*parts: str) -> Path:
    """Path under ../shared/data; skips the test when it is absent, except in CI where it must exist."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI expects the shared data at {path}")
        pytest.skip(f"shared data not available: {path}")
    return path


@pytest.fixture
def shared_data():
    """Callable fixture: ``shared_data("vifb", "ir")`` returns the path or skips."""
    return shared_data_dir


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    return torch.device(request.param)


@pytest.fixture
def one_thread():
    """Tiny problems: one thread avoids OpenMP spin-waiting on a loaded 2-core machine (up to 100× slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed() -> None:
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
